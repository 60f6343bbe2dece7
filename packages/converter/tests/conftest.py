import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# The crafted-checkpoint recipes (crafted_checkpoints.py) are shared with draft-models' tests, and
# kept there rather than in any package's sources: they hold a code-running pickle payload.
sys.path.insert(1, str(Path(__file__).resolve().parents[2] / "draft-models" / "tests"))
