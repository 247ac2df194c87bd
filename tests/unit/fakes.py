"""The one subprocess seam (``rush_hpc.launchers.base.call``) replaced by canned answers, as
submitit's MockedSubprocess does: each test says what sacct / squeue / scancel print and then
checks exactly which commands were run."""

from __future__ import annotations

from typing import Callable, Sequence

from rush_hpc.exceptions import CommandError


class FakeCommands:
    def __init__(self, answers: dict[str, str | Callable[[list[str]], str]] | None = None) -> None:
        self.answers = dict(answers or {})
        self.calls: list[list[str]] = []

    def __call__(self, cmd: Sequence[str], **_: object) -> str:
        cmd = list(cmd)
        self.calls.append(cmd)
        answer = self.answers.get(cmd[0])
        if answer is None:
            raise CommandError(cmd, 127, "", f"{cmd[0]}: command not found")
        return answer(cmd) if callable(answer) else answer

    def of(self, program: str) -> list[list[str]]:
        return [c for c in self.calls if c[0] == program]


def install(monkeypatch, answers: dict[str, str | Callable[[list[str]], str]]) -> FakeCommands:
    """Patch the seam in every module that imported it."""
    from rush_hpc.launchers import sbatch, slurm

    fake = FakeCommands(answers)
    monkeypatch.setattr(slurm, "call", fake)
    monkeypatch.setattr(sbatch, "call", fake)
    return fake
