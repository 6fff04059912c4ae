"""Test-suite settings shared by the unit tests and the nbval notebook runs.

Notebook kernels started by nbval inherit this process's environment, so setting
COURSE_QUICK here puts every notebook on its quick path (smaller sizes, shorter runs).
"""
import os

os.environ["COURSE_QUICK"] = "1"
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
