"""Command-line training from a checkout; the same as the installed ``aa-flax-train``:

  python train.py --workdir=/tmp/run [--config=configs/<file>.py[:<arg>]] [--config.a.b=v ...]

Flags, exit status and output are described in ``aa_flax/cli.py``.
"""

from aa_flax import cli

if __name__ == "__main__":
  cli.run()
