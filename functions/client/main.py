"""Google Cloud Functions entry for the FedKeeper client (deploy with --entry-point client)."""

import functions_framework

from fedkeeper.platforms import gcf


@functions_framework.http
def client(request):
    """HTTP: the function's JSON API."""
    return gcf.http("client", request)
