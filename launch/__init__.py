"""Launchers: `python -m launch.local` (torchrun on this machine), `python -m launch.submit` (SLURM via submitit)."""
