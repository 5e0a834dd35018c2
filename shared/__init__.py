"""The contract between ingest and workers: settings, key names, event model and job codec."""
