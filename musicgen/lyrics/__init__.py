"""Lyrics front end: from what users type to frame-aligned phone tokens identical to DiffRhythm's."""
