"""`difflab serve`: a local web page (and JSON API) to sample from models, on the standard
library's HTTP server. `catalog` describes and lazily loads the models, `validate` checks
requests, `jobs` queues and runs them one at a time, `render` draws the PNG, `server` is HTTP."""

from difflab.serve.catalog import Catalog, ModelEntry
from difflab.serve.jobs import JobCancelled, JobQueue
from difflab.serve.server import DifflabServer, make_server, serve
from difflab.serve.validate import JobRequest, RequestError, check_job

__all__ = [
    "Catalog",
    "DifflabServer",
    "JobCancelled",
    "JobQueue",
    "JobRequest",
    "ModelEntry",
    "RequestError",
    "check_job",
    "make_server",
    "serve",
]
