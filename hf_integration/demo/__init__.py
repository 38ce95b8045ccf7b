"""The embedded demo data: small, deterministic generated datasets the example jobs and the tests run on offline.

* :mod:`hf_integration.demo.sentiment`: a sentiment-like text-classification set from word lists;
* :mod:`hf_integration.demo.instructions`: short instruction tasks with checkable answers, and controlled response
  corruptions (wrong, swapped, truncated, off-task).
"""
