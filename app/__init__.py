"""The chat service: FastAPI + Redis around the model, which it uses only through model/__init__.py.

factory.py builds the app (`create_app`), cli.py runs it; engine/ owns the model on its thread,
openai/ is the OpenAI-compatible surface, store/ is Redis, routes/ the REST, websocket and admin
routes. docs/DESIGN.md follows one chat turn through them.
"""
