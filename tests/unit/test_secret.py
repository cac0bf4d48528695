"""Secrets live in buffers we own and wipe: read in place, grown without leaving copies, never bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unlocker.boot import prompt
from unlocker.secret import Secret, SecretBuffer


def test_random_reads_the_kernel_rng_into_its_own_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_urandom(size: int) -> bytes:
        raise AssertionError("os.urandom hands the key over in an immutable bytes")

    monkeypatch.setattr(os, "urandom", no_urandom)
    one, two = Secret.random(32), Secret.random(32)
    assert len(one) == len(two) == 32 and isinstance(one.data, bytearray)
    assert one != two and one.data != bytes(32)


def test_a_growing_buffer_wipes_what_it_leaves_behind() -> None:
    read, write = os.pipe()
    os.write(write, b"k" * 10_000)
    os.close(write)
    buffer = SecretBuffer(16)
    first = buffer._data
    while buffer.read_from(read, 4096):
        pass
    os.close(read)
    assert first is not buffer._data and first == bytes(len(first))  # grown: the old memory wiped
    kept = buffer._data
    secret = buffer.take()
    assert secret.data == b"k" * 10_000
    assert kept == bytes(len(kept)) and len(buffer) == 0  # taken: wiped


def test_a_key_file_is_read_whole_and_its_buffer_wiped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "key"
    path.write_bytes(bytes(range(256)) * 400)
    made: list[SecretBuffer] = []
    real = SecretBuffer

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, capacity: int) -> None:
            super().__init__(capacity)
            made.append(self)

    monkeypatch.setattr("unlocker.secret.SecretBuffer", Recording)
    assert Secret.read_file(str(path)).data == path.read_bytes()
    assert len(made) == 1 and made[0]._data == bytes(len(made[0]._data))


def _recording_buffers(monkeypatch: pytest.MonkeyPatch) -> list[SecretBuffer]:
    made: list[SecretBuffer] = []

    class Recording(SecretBuffer):
        def __init__(self, capacity: int) -> None:
            super().__init__(capacity)
            made.append(self)

    monkeypatch.setattr(prompt, "SecretBuffer", Recording)
    return made


@pytest.mark.parametrize(("typed", "expected"), [
    (b"correct horse\n", b"correct horse"), (b"no newline", b"no newline"), (b"cr\r", b"cr"),
    (b"x" * 600 + b"\n", b"x" * 512),  # cryptsetup's limit: the rest is read and dropped
])
def test_the_prompt_reads_into_one_buffer_and_wipes_it(typed: bytes, expected: bytes,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    made = _recording_buffers(monkeypatch)
    read, write = os.pipe()
    os.write(write, typed)
    os.close(write)
    try:
        answer = prompt._read_line(read)
    finally:
        os.close(read)
    assert answer is not None and answer.data == expected
    [buffer] = made
    assert len(buffer._data) == prompt.MAX_PASSPHRASE + 1  # never grown: never copied
    assert buffer._data == bytes(len(buffer._data))


def test_the_agents_answer_never_lands_in_a_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = tmp_path / "systemd-ask-password"
    agent.write_text("#!/bin/sh\nprintf 'hunter2\\n'\n")
    agent.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    made = _recording_buffers(monkeypatch)
    seen = []
    real_run = prompt.run

    def run(argv: list[str], **kwargs: object) -> object:
        done = real_run(argv, **kwargs)  # type: ignore[arg-type]
        seen.append(done)
        return done

    monkeypatch.setattr(prompt, "run", run)
    answer = prompt.ask_with_agent("Passphrase?")
    assert answer is not None and answer.data == b"hunter2"
    assert seen[0].stdout == b""  # the answer was read into the secret buffer only
    assert made[0]._data == bytes(len(made[0]._data))


@pytest.mark.parametrize("second", [None, b"", b"x" * 257], ids=["no-second-answer", "empty", "too-long"])
def test_a_new_pin_asked_once_but_not_confirmed_is_wiped(second: bytes | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """enroll --with-pin asks twice: when the second answer is no PIN at all (end of input, empty, too
    long), the first one, a good PIN, is wiped before the refusal, as it is when the two differ."""
    from unlocker.commands import pin as pin_entry
    from unlocker.errors import UsageError

    first = Secret(bytearray(b"2468"))
    answers = [first, None if second is None else Secret(bytearray(second))]
    monkeypatch.setattr(pin_entry, "ask_on_terminal", lambda message: answers.pop(0))
    with pytest.raises(UsageError):
        pin_entry.new_pin(None, None)
    assert first.data == bytearray()
