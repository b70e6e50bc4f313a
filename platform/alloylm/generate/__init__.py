"""Teacher-written data: question-answer chats, preference pairs and held-out benchmark questions,
generated from the chunks of a run's own text data set (e.g. a folder of PDF papers) by any
OpenAI-compatible model endpoint, on Ray Data.

A `generate:` data set of the run config (`alloylm.config.GenerateConfig`) is prepared by
`alloylm.data.prepare` like any other: `alloylm.generate.run.generate_items` writes its items, then
the usual pipeline cleans, deduplicates and tokenizes them. See docs/generation.md.
"""
