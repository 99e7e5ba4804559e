"""The SLURM and multi-node torchrun examples in ``scripts/slurm`` cannot drift from Lightning's rules.

No SLURM cluster is available to the tests, so the scripts are parsed: Lightning's
SLURMEnvironment needs ``--ntasks-per-node`` equal to ``--trainer.devices`` and ``--nodes`` equal
to ``--trainer.num_nodes``; the ``srun`` command's arguments must parse as a clusterlight command
line (``--print_config``); torchrun's process counts must be the Trainer's.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from clusterlight.cli import main

SLURM = Path(__file__).resolve().parents[1] / "scripts" / "slurm"
SBATCH = SLURM / "fit_multinode.sbatch"
TORCHRUN = SLURM / "fit_torchrun_multinode.sh"


def _sbatch_options(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", text, flags=re.MULTILINE))


def _srun_args(text: str) -> list[str]:
    """The arguments after ``srun clusterlight`` with the script's defaults filled in."""
    joined = text.replace("\\\n", " ")
    line = next(ln for ln in joined.splitlines() if ln.strip().startswith("srun "))
    config = re.search(r"^CONFIG=\$\{CONFIG:-(\S+)\}", text, flags=re.MULTILINE).group(1)
    config = str(SLURM.parents[1] / config)  # the script runs from the repository root
    line = line.replace('"$@"', "").replace('"$CONFIG"', config).replace("${SLURM_JOB_ID}", "12345")
    words = shlex.split(line)
    assert words[:2] == ["srun", "clusterlight"], words
    return words[2:]


def _flag(args: list[str], name: str) -> str:
    for i, word in enumerate(args):
        if word == name:
            return args[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def test_sbatch_tasks_match_trainer_devices() -> None:
    text = SBATCH.read_text()
    options = _sbatch_options(text)
    args = _srun_args(text)
    assert args[0] == "fit"
    assert int(options["ntasks-per-node"]) == int(_flag(args, "--trainer.devices"))
    assert int(options["nodes"]) == int(_flag(args, "--trainer.num_nodes"))
    assert int(options["gpus-per-node"]) == int(_flag(args, "--trainer.devices"))
    assert _flag(args, "--trainer.strategy") == "ddp"
    assert options["signal"].startswith("SIGUSR1@") and "requeue" in options


def test_sbatch_command_parses(capsys: pytest.CaptureFixture[str]) -> None:
    args = _srun_args(SBATCH.read_text())
    assert Path(_flag(args, "--config")).is_file()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert int(trainer["num_nodes"]) == 2 and int(trainer["devices"]) == 4 and trainer["strategy"] == "ddp"


def test_torchrun_example_matches_trainer() -> None:
    text = TORCHRUN.read_text()
    assert '--nproc_per_node "$NPROC_PER_NODE"' in text and '--trainer.devices "$NPROC_PER_NODE"' in text
    assert '--nnodes "$NNODES"' in text and '--trainer.num_nodes "$NNODES"' in text
    assert "-m clusterlight fit" in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", [SBATCH, TORCHRUN], ids=lambda p: p.name)
def test_scripts_are_valid_bash(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
