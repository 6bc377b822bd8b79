"""The library behind the scripts: everything but the scripts and the shared dataset, models and utils modules."""
