"""Task LightningModules, one file per task (``probe.py``, ...). YAML configs reach them by
module path (``class_path: diffperc.tasks.probe.ProbeTask``); the shared base is in ``_base.py``."""
