"""Lyrics front end: from what users type to each model family's token input, identical to the official
code's: frame-aligned phone tokens for DiffRhythm 1 (`timed`), section-tagged ones for DiffRhythm 2
(`sections`)."""
