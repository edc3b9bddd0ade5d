"""The run service: configs, the controller that schedules candidates onto workers and records them, the run
directory and its ledger, hybrid stages, status and export, the pre-flight check, the report and its plots."""
