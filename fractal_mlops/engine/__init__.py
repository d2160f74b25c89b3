"""Training and evaluating one FractalNet: the model, drop-path, data, device, the epoch
loop and anytime inference. Knows nothing of Optuna or MLflow."""
