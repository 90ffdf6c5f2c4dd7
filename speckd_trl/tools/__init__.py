"""Stand-alone tools around the library: the memory planner (`plan`, ``speckd-trl plan``), the student as a
speculative-decoding drafter (`drafter`), the generated documentation pages (`docs`, ``python -m
speckd_trl.tools.docs``) and tiny offline models, tokenizers and data for tests and examples (`testing`). The
library's trainers do not import them.
"""
