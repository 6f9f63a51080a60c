import os
import sys

# fuzzing.py (profiles) and scenarios.py import as plain modules
sys.path.insert(0, os.path.dirname(__file__))
