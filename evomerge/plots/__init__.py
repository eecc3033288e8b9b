"""Pictures of a study: ``evomerge pareto --plot``, ``evomerge plot history|recipe`` and the
three images an export puts beside its model card.

One module per figure, each with a data function (plain numbers) and a drawing function (a
matplotlib Figure on the Agg canvas: no display, no pyplot state):

- :mod:`~evomerge.plots.pareto`: the trials and the Pareto front (``pareto_data``,
  ``pareto_figure``, ``plot_pareto``).
- :mod:`~evomerge.plots.history`: the best value so far against trials and time of search
  (``history_series``, ``history_figure``, ``search_clock``).
- :mod:`~evomerge.plots.recipe`: a trial's merge coefficients by layer and tensor kind
  (``recipe_grid``, ``recipe_matrix``, ``trial_recipe_grid``, ``recipe_figure``).
- :mod:`~evomerge.plots.path`: a data-flow trial's layer path, model and layer per depth with
  its input scalings (``path_grid``, ``path_figure``).
- :mod:`~evomerge.plots.images`: the export's three PNGs (``study_images``).

Shared by the figures: :mod:`~evomerge.plots.png` (checked paths, atomic PNG writing, a new
figure) and :mod:`~evomerge.plots.labels` (the baselines' markers and tags, and where the tags
go). The ``plot`` command line is :mod:`evomerge.cli.plot`. Nothing heavy is imported here.
"""
