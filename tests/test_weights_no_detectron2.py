"""Conversion without --verify imports no Detectron2: weights convert where it is not installed
(only verification builds Detectron2's ResNet). Checked in a fresh interpreter, through the
library and through the command line."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
import torch, torchvision
torch.manual_seed(0)
src, out = sys.argv[1], sys.argv[2]
torch.save({"encoder": torchvision.models.resnet18().state_dict(), "method": "loco",
            "arch": "resnet18"}, src)
import loco_det.weights.convert as convert
result = convert.convert(src, out + "/lib.pkl")
assert result.depth == 18 and result.verify_error is None, result
from loco_det.commands import convert as command
assert command.main([src, out + "/cli.pkl"]) == 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("detectron2", "fvcore"))
assert not loaded, f"conversion without --verify imported {loaded[:5]}"
print("no detectron2: ok")
"""


def test_conversion_without_verify_imports_no_detectron2(tmp_path):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt.pth"),
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "no detectron2: ok" in res.stdout
    assert (tmp_path / "lib.pkl").is_file() and (tmp_path / "cli.pkl").is_file()
