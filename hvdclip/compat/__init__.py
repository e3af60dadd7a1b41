"""Horovod's TensorFlow and Keras API on Keras 3: what `hvdclip.tensorflow` and `hvdclip.keras` export.

One module per concept: `runtime` (start-up and the queries about the job and the build),
`process_sets`, `collectives` (tensor collectives and variable broadcasts), `keras_collectives`
(`horovod.tensorflow.keras`'s value collectives), `saving` (`load_model`) and `elastic`. Where
Horovod's own function works unchanged on Keras 3 it is re-exported, the same object; where it
breaks, the replacement keeps Horovod's name, signature and defaults. `docs/horovod.md` lists
every name of Horovod's modules and says which is which, and why.
"""

__all__: list[str] = []
