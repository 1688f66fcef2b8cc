"""sbsampler inside the trainers people use; each module imports its framework, so import the one you need.

- ``sbsampler.integrations.lightning``: ``SelectiveBackprop``, a Lightning ``Callback``;
- ``sbsampler.integrations.transformers``: ``SelectiveTrainer``, a HuggingFace ``Trainer``;
- ``sbsampler.integrations.accelerate``: ``selective_loader`` for a loader after ``accelerator.prepare``.

All three select per batch with ``sbsampler.selector.BatchSelector`` (accelerate's
with ``SelectiveLoader``), and keep its state in the framework's checkpoint.
"""
