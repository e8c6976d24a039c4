# The imports check_models.py needs; run by scripts/venv once the venv is made.
import openai.types.chat  # noqa: F401
import vapi.types  # noqa: F401
