"""Running a command in a sandboxed subprocess.

The command runs in its own session and process group (so a timeout kills everything it started, not just
its first process), with `resource` limits on CPU time, memory, file size and open files, in a fresh
temporary working directory, and with an environment built from scratch: nothing the executor inherited
(database URLs, NATS passwords, API keys) is visible to it.

This is process isolation, not a container: the command still runs as the executor's user and sees its
filesystem. Run the executor as an unprivileged user in a container (as the deployment does) so that what
a shell tool can touch is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_MAX_OPEN_FILES = 256


@dataclass(frozen=True)
class SandboxLimits:
    timeout_seconds: float
    max_memory_mb: int = 512
    max_output_bytes: int = 64 * 1024
    max_file_size_mb: int = 64


@dataclass(frozen=True)
class SandboxResult:
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool


def _limit_child(limits: SandboxLimits) -> None:
    # Runs in the child between fork and exec: only async-signal-safe work (setrlimit is).
    cpu = int(limits.timeout_seconds) + 1
    memory = limits.max_memory_mb * 1024 * 1024
    file_size = limits.max_file_size_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    resource.setrlimit(resource.RLIMIT_NOFILE, (_MAX_OPEN_FILES, _MAX_OPEN_FILES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def _read_capped(stream: asyncio.StreamReader | None, cap: int) -> tuple[bytes, bool]:
    if stream is None:
        return b"", False
    kept = bytearray()
    truncated = False
    while chunk := await stream.read(65536):
        room = cap - len(kept)
        if room > 0:
            kept += chunk[:room]
        if len(chunk) > room:
            truncated = True
    return bytes(kept), truncated


async def run_sandboxed(
    argv: list[str],
    limits: SandboxLimits,
    *,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
) -> SandboxResult:
    """Run `argv` in the sandbox. On timeout the whole process group is killed and `timed_out` is set."""
    clean_env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    with tempfile.TemporaryDirectory(prefix="agentbus-tool-") as workdir:
        clean_env["HOME"] = workdir
        clean_env["TMPDIR"] = workdir
        clean_env.update(env or {})
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=workdir,
            env=clean_env,
            start_new_session=True,
            preexec_fn=lambda: _limit_child(limits),
            close_fds=True,
        )
        pgid = process.pid  # start_new_session: the child leads its own session and process group
        timed_out = False
        try:
            async with asyncio.timeout(limits.timeout_seconds):
                if stdin is not None and process.stdin is not None:
                    process.stdin.write(stdin)
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        await process.stdin.drain()
                    process.stdin.close()
                (out, out_cut), (err, err_cut) = await asyncio.gather(
                    _read_capped(process.stdout, limits.max_output_bytes),
                    _read_capped(process.stderr, limits.max_output_bytes),
                )
                exit_code: int | None = await process.wait()
        except TimeoutError:
            timed_out = True
            _kill_group(pgid)
            await process.wait()
            exit_code = None
            out, out_cut, err, err_cut = b"", False, b"", False
        except BaseException:
            _kill_group(pgid)
            raise
        # Anything it left running in the background goes too: the tool is over when its command is.
        _kill_group(pgid)
    return SandboxResult(
        exit_code=exit_code,
        stdout=out.decode("utf-8", errors="replace"),
        stderr=err.decode("utf-8", errors="replace"),
        timed_out=timed_out,
        truncated=out_cut or err_cut,
    )
