"""The serving side (runtime, manifest, preprocessing, exit policy, CLI) must work where torch is not installed."""

import subprocess
import sys


def test_runtime_modules_import_without_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
        "sys.modules['torchvision'] = None\n"
        "import reskd.runtime, reskd.preprocess, reskd.manifest, reskd.exit_policy, reskd.cli\n"
        "reskd.cli.build_parser().parse_args(['calibrate', '--repo', 'r', '--model', 'm'])\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
