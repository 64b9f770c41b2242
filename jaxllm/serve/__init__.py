"""`jaxllm serve`: an OpenAI-compatible server over continuous batching.

engine.py: the fixed-slot KV cache and the jitted prefill and decode steps;
scheduler.py: requests in and out of the slots, a plain Python loop;
app.py: the HTTP routes (Starlette via FastAPI, run by uvicorn).
"""
