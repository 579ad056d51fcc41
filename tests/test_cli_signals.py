"""Ctrl-C stops every command with one line and status 130 (also with forked workers); a closed output pipe is no
traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli_helpers import run_cli, subprocess_env
from finercam import cli

# --------------------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_is_one_line_with_status_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    from finercam import commands

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "run_explain", interrupted)
    status, _, errors = run_cli(["explain", "x.png", "--model", "embedded:cnn"], capsys)
    assert (status, errors) == (130, "finercam explain: interrupted (Ctrl-C)\n")  # explain resumes nothing
    assert cli.interrupted_message("evaluate") == (
        "finercam evaluate: interrupted (Ctrl-C); the results written so far are kept: rerun the same command to "
        "resume"
    )


@pytest.mark.skipif(sys.platform != "linux", reason="forked workers and process groups")
def test_ctrl_c_on_run_with_forked_workers_prints_one_line(tmp_path: Path) -> None:
    """A terminal's Ctrl-C sends SIGINT to the whole process group: the parent and every forked worker."""
    script = textwrap.dedent(f"""
        import sys, time
        from finercam import cli
        from finercam.dataset import command, parallel

        def nap(task):
            print("ready", flush=True)
            time.sleep(60)
            return task

        def dispatch(args):
            for _ in parallel.forked_map(nap, [0, 1], 2):
                pass
            return 0

        command.dispatch = dispatch
        sys.exit(cli.main(["run", "--model", "embedded:cnn", "--data", {str(tmp_path)!r},
                           "--out", {str(tmp_path / "store")!r}]))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, env=subprocess_env(), text=True)
    try:
        assert child.stdout is not None
        for _ in range(2):  # both workers are running
            assert child.stdout.readline() == "ready\n", child.stderr.read() if child.stderr else ""
        os.killpg(child.pid, signal.SIGINT)
        _, errors = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130
    assert errors == ("finercam run: interrupted (Ctrl-C); the results written so far are kept: rerun the same "
                      "command to resume\n")


@pytest.mark.skipif(sys.platform != "linux", reason="forked workers")
def test_forked_workers_leave_ctrl_c_to_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from finercam.dataset import command, parallel

    def child_ignores_sigint(task: int) -> bool:
        return signal.getsignal(signal.SIGINT) is signal.SIG_IGN

    seen: list[bool] = []

    def dispatch(args: object) -> int:
        seen.extend(result for _, result in parallel.forked_map(child_ignores_sigint, [0, 1], 2))
        return 0

    monkeypatch.setattr(command, "dispatch", dispatch)
    status, _, errors = run_cli(["run", "--model", "embedded:cnn", "--data", str(tmp_path), "--out",
                              str(tmp_path / "store")], capsys)
    assert status == 0, errors
    assert seen == [True, True]  # a worker would otherwise print its own KeyboardInterrupt traceback
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # the parent's handler is untouched


def test_a_closed_output_pipe_is_no_traceback(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "finercam", "synth", "--out", str(tmp_path / "syn"), "--train", "0", "--test", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(), text=True,
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # as `finercam synth ... | head -1` does once head has its line
    errors = child.stderr.read()
    child.wait(timeout=60)
    assert "Traceback" not in errors and child.returncode == 1, errors
