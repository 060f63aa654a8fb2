import subprocess
import sys

from difflab import __version__
from difflab.cli import main


def test_version_and_help(capsys):
    out = subprocess.run([sys.executable, "-m", "difflab.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"difflab {__version__}"
    assert main([]) == 0
    assert "train" in capsys.readouterr().out


def test_schedules_command_writes_a_png(tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["schedules", "--T", "50", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cosine+ztsnr" in capsys.readouterr().out


def test_bad_value_is_a_clear_error_not_a_traceback(capsys):
    assert main(["schedules", "--T", "0", "--out", "x.png"]) == 2
    assert "T (number of diffusion steps) must be an integer >= 1" in capsys.readouterr().err
