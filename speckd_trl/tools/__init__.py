"""Stand-alone tools around the library: the memory planner (`plan`, ``speckd-trl plan``), the student as a
speculative-decoding drafter (`drafter`) and tiny offline models, tokenizers and data for tests and examples
(`testing`). The library's trainers do not import them.
"""
