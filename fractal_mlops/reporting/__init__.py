"""The study report: what it reads from MLflow, its figures and its HTML page."""
