"""Where the stores live: store URLs and files, the Optuna storage, credentials, outages and
repair of damaged stores."""
