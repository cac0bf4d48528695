# The one install description every package uses (debian/rules, packaging/arch/PKGBUILD):
#   make                                        the frozen binary, the man page and the completions
#   make install DESTDIR=/tmp/root PREFIX=/usr  every file where the distributions expect it
# Make, not meson: nothing here is compiled by us (PyInstaller freezes, argparse-manpage and shtab
# generate) and both packagers call `make install` with no extra build dependency.
# ZSHCOMPDIR differs by distribution: Arch reads $(PREFIX)/share/zsh/site-functions, Debian's zsh
# only /usr/share/zsh/vendor-completions (debian/rules says so).

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
MANDIR ?= $(PREFIX)/share/man
SYSCONFDIR ?= /etc
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/site-functions
UNITDIR ?= $(LIBDIR)/systemd/system
DRACUTDIR ?= $(LIBDIR)/dracut/modules.d/90tpm2-unlocker
INITCPIODIR ?= $(LIBDIR)/initcpio
# the venv ./run setup makes, if there is one: PyInstaller, tpm2-pytss, argparse-manpage and shtab
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

BINARY = dist/tpm2-unlocker
MANPAGE = dist/tpm2-unlocker.8
BASH_COMPLETION = dist/completion/tpm2-unlocker.bash
ZSH_COMPLETION = dist/completion/_tpm2-unlocker
SOURCES = $(shell find unlocker freeze -name '*.py')

# $(call inst,MODE,SOURCE,DESTINATION): one installed file (its folders made)
inst = install -D -m $(1) $(2) $(DESTDIR)$(3)

.PHONY: all install install-debian clean
all: $(BINARY) $(MANPAGE) $(BASH_COMPLETION) $(ZSH_COMPLETION)

$(BINARY): $(SOURCES)
	$(PYTHON) -m freeze.build --out dist

$(MANPAGE): $(SOURCES) docgen/manpage.py
	$(PYTHON) -m docgen.manpage $@

$(BASH_COMPLETION): $(SOURCES) docgen/completion.py
	$(PYTHON) -m docgen.completion bash $@

$(ZSH_COMPLETION): $(SOURCES) docgen/completion.py
	$(PYTHON) -m docgen.completion zsh $@

# One line per installed file. A new hook (a post hook of an image rebuild, say) is one more line.
install: all
	$(call inst,0755,$(BINARY),$(BINDIR)/tpm2-unlocker)
	$(call inst,0755,dracut/90tpm2-unlocker/module-setup.sh,$(DRACUTDIR)/module-setup.sh)
	$(call inst,0755,dracut/90tpm2-unlocker/tpm2-unlocker-initqueue.sh,$(DRACUTDIR)/tpm2-unlocker-initqueue.sh)
	$(call inst,0755,dracut/90tpm2-unlocker/tpm2-unlocker-lock.sh,$(DRACUTDIR)/tpm2-unlocker-lock.sh)
	$(call inst,0644,dracut/90tpm2-unlocker/tpm2-unlocker.service,$(DRACUTDIR)/tpm2-unlocker.service)
	$(call inst,0644,dracut/90tpm2-unlocker/tpm2-unlocker-lock.service,$(DRACUTDIR)/tpm2-unlocker-lock.service)
	$(call inst,0644,dracut/90tpm2-unlocker/systemd-cryptsetup-skip.conf,$(DRACUTDIR)/systemd-cryptsetup-skip.conf)
	$(call inst,0644,mkinitcpio/install/tpm2-unlocker,$(INITCPIODIR)/install/tpm2-unlocker)
	$(call inst,0644,mkinitcpio/hooks/tpm2-unlocker,$(INITCPIODIR)/hooks/tpm2-unlocker)
	$(call inst,0644,dracut/90tpm2-unlocker/tpm2-unlocker.service,$(UNITDIR)/tpm2-unlocker.service)
	$(call inst,0644,dracut/90tpm2-unlocker/tpm2-unlocker-lock.service,$(UNITDIR)/tpm2-unlocker-lock.service)
	$(call inst,0644,dracut/90tpm2-unlocker/systemd-cryptsetup-skip.conf,$(LIBDIR)/tpm2-unlocker/systemd-cryptsetup-skip.conf)
	$(call inst,0644,$(MANPAGE),$(MANDIR)/man8/tpm2-unlocker.8)
	$(call inst,0644,$(BASH_COMPLETION),$(BASHCOMPDIR)/tpm2-unlocker)
	$(call inst,0644,$(ZSH_COMPLETION),$(ZSHCOMPDIR)/_tpm2-unlocker)
	$(call inst,0755,update-hooks/reseal-predict,$(LIBDIR)/tpm2-unlocker/reseal-predict)
	$(call inst,0755,mkinitcpio/post/tpm2-unlocker,$(INITCPIODIR)/post/tpm2-unlocker)
	$(call inst,0755,kernel-install/90-tpm2-unlocker.install,$(LIBDIR)/kernel/install.d/90-tpm2-unlocker.install)

# Debian's hooks of a kernel install and an initramfs rebuild (debian/rules calls this too); each new
# path also gets its line in docgen/manpage.py's FILES.
install-debian:
	$(call inst,0755,update-hooks/postinst.d/zz-tpm2-unlocker,$(SYSCONFDIR)/kernel/postinst.d/zz-tpm2-unlocker)
	$(call inst,0755,update-hooks/post-update.d/tpm2-unlocker,$(SYSCONFDIR)/initramfs/post-update.d/tpm2-unlocker)

clean:
	rm -rf dist build/pyinstaller
