"""The search over the grid: settings, one worker's loop, the launcher, claims, a trial, the
epoch loop, halving, outcomes, and reproducing a trial."""
