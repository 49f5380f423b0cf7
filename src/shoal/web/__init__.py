"""HTTP plumbing shared by the node API and a runner's endpoint: OpenAI error bodies, SSE framing.

Imports nothing from shoal but schema, so the runner can serve without the node app.
"""
