"""Fine-tuning methods, one module each: what a method adds to a backbone and to the training loop.

A ``conf/method/<name>.yaml`` names its class in ``method.plugin`` (see :func:`partial_lora.settings.method_of`);
the harness (config checks, pipeline, dry run) asks that object instead of testing which keys a config has.
"""
