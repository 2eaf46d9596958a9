"""User-facing errors, shared by every command-line entry point.

A `UserError` is a mistake the user can fix (a missing file, wrong columns, an impossible option).
The CLIs print its message as ONE line on stderr and exit with status 2; a genuine bug still shows
its traceback. Set RM_DEBUG=1 (or pass --debug) to see the traceback of a UserError too.

Output never costs work: run_cli puts stdout and stderr behind `ClosedPipeSafe`, so a print into a pipe
whose reader has gone (`train.py | tee log` after Ctrl-C killed tee, `eval.py | head`) is dropped instead of
raising BrokenPipeError in the middle of a step or a checkpoint; the exit status stays the command's own.
"""
import argparse
import os
import sys
from pathlib import Path


class UserError(Exception):
    """Bad input: the message names the problem and what to do about it."""
    quiet = False  # True on the copies that torchrun ranks other than 0 raise: rank 0 prints the line, once


class ClosedPipeSafe:
    """A text stream (sys.stdout, sys.stderr) that drops what is written once its pipe has no reader, rather
    than raise BrokenPipeError wherever the next print happens to be. The file descriptor is then pointed
    at /dev/null, so the interpreter's last flush of the real stream (and anything written below Python)
    is dropped too, instead of printing a BrokenPipeError at exit and turning the exit status into 120."""

    def __init__(self, stream):
        self.stream, self.reader_gone = stream, False

    def _guard(self, write, *args):
        if not self.reader_gone:
            try:
                return write(*args)
            except BrokenPipeError:
                self.reader_gone = True
                try:
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, self.stream.fileno())
                    os.close(devnull)
                except (OSError, ValueError, AttributeError):  # not a real file (a test's capture): dropping is enough
                    pass

    def write(self, text):
        self._guard(self.stream.write, text)
        return len(text)

    def writelines(self, lines):
        self._guard(self.stream.writelines, lines)

    def flush(self):
        self._guard(self.stream.flush)

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the real stream's
        return getattr(self.stream, name)


def run_cli(main, argv=None):
    """Run `main(argv)`, turning a UserError into one line on stderr and exit status 2, and a Ctrl-C that
    nothing else handled (loading data, scoring, the training loop handles its own) into one line and 130.
    Meanwhile stdout and stderr are ClosedPipeSafe: a reader that has gone never ends the command."""
    debug = os.environ.get("RM_DEBUG") == "1" or "--debug" in (argv if argv is not None else sys.argv)
    real = sys.stdout, sys.stderr
    # (None: Python started with that descriptor closed, and print() already drops what goes there)
    sys.stdout, sys.stderr = (s if s is None or isinstance(s, ClosedPipeSafe) else ClosedPipeSafe(s) for s in real)
    try:
        return main(argv)
    except UserError as e:
        if debug:
            raise
        if not e.quiet:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    finally:
        for stream in (sys.stdout, sys.stderr):  # what is still buffered, while a gone reader is harmless
            if stream is not None:
                stream.flush()
        sys.stdout, sys.stderr = real


class ArgumentParser(argparse.ArgumentParser):
    """argparse for our CLIs: a bad flag is a user error like any other (one line, exit status 2), and a
    negative number after a flag is its value."""

    def error(self, message):
        command = self.prog if self.prog.startswith("python ") else f"python {self.prog}"  # prog: "python -m tools.X"
        raise UserError(f"{message} (see {command} --help)")

    def parse_args(self, args=None, namespace=None):
        return super().parse_args(join_negative_values(sys.argv[1:] if args is None else list(args)), namespace)


def join_negative_values(argv: list[str]) -> list[str]:
    """`--learning_rate -1e-5` as `--learning_rate=-1e-5`. argparse takes a word that starts with '-' for a
    flag unless it matches its negative-number pattern, which before Python 3.14 misses exponents ('-1e-5')
    and '-inf'/'-nan': the user got "expected one argument" instead of validate()'s message."""
    joined = []
    for i, a in enumerate(argv):
        if a == "--":  # everything after it is a value anyway
            return joined + argv[i:]
        before = joined[-1] if joined else ""
        if a.startswith("-") and before.startswith("--") and "=" not in before:
            try:
                float(a)
            except ValueError:
                pass
            else:
                joined[-1] = f"{before}={a}"
                continue
        joined.append(a)
    return joined


def check_writable(directory: Path, what: str, fix: str):
    """Probe with a real file that `directory` can be written (creating it if needed), then leave the disk
    exactly as it was, whether the probe worked or not (a full disk fails the write after the file was
    made): a run that fails its checks must not leave an empty output directory or a probe behind."""
    directory = Path(directory)
    created = [d for d in [directory, *directory.parents] if not os.path.lexists(d)]  # deepest first
    probe = directory / f".write-test-{os.getpid()}"
    made = False
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        made = True
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {what} ({e.strerror}); {fix}") from None
    finally:
        if made:
            probe.unlink(missing_ok=True)
        for d in created:
            try:
                d.rmdir()
            except FileNotFoundError:  # a deeper directory whose making failed: its parents may still be ours
                continue
            except OSError:
                break
