"""Data-flow-space merging: a token's path through layers drawn from several models.

- :mod:`~evomerge.dataflow.recipe`: a path recipe (which layer of which model at each depth, and
  the input scaling where the path crosses between models) and its export plan;
- :mod:`~evomerge.dataflow.space`: the ``kind: dataflow`` search space that decodes genomes into
  path recipes;
- :mod:`~evomerge.dataflow.assemble`: a worker's model whose layer list references resident
  layers, rebuilt per candidate without copying weights;
- :mod:`~evomerge.dataflow.mergekit`: the same path as a mergekit ``passthrough`` config.
"""
