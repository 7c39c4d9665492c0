"""What a save starts from, each turned into the same plan by fastsave.plan.walk.

* :mod:`fastsave.inputs.live_model`: a trained peft / transformers model in memory, its base
  weights as the model holds them ("dequantized"), or read from the original 16-bit checkpoint
  ("original");
* :mod:`fastsave.inputs.saved_adapter`: a saved adapter plus a 16-bit base on disk (``fastsave
  merge``), with the base weights a 4-bit load would quantize reproduced by an NF4 round trip.
"""
