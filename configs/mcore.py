"""Another config by name, for Megatron launch scripts: `--config=configs/mcore.py:tiny`.

The argument names a config in this directory and its argument (`tiny`, `tiny:i2v`,
`mugv_10b:video_720`). Every config already carries the `megatron` section (configs/base.py,
fields in mugv.training.MegatronOptions), so this is the same as `--config=configs/<name>.py:<arg>`;
it stays for the launch scripts and docs that name it.
"""

import importlib


def get_config(arg: str | None = None):
    name, _, sub = (arg or "tiny").partition(":")
    try:
        module = importlib.import_module(f"configs.{name}")
    except ModuleNotFoundError:
        raise ValueError(f"configs/mcore.py: no config configs/{name}.py (argument {arg!r})") from None
    return module.get_config(sub) if sub else module.get_config()
