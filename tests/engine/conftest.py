"""The engine tests' fixtures (config, space, model, data, train).

None is shared between the engine's test modules yet: each module's fixtures (the digits
datasets of test_train, the trained models of test_weight_sharing) stay in it. Shared helpers
are in tests/helpers.py.
"""
