"""Importance scores and what is dropped from them: metrics (`metrics`), ranking and limits
(`selection`), the one drop walk and its schedules (`schedule`), the registries that take a
user's own metric, schedule or rule (`registry`), and layer-streamed scoring for models larger
than memory (`streaming`, `streamed_writer`).

Nothing is imported here: importing a module of this package loads only what that module needs."""
