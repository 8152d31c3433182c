"""Google Cloud Functions entry for the FedKeeper trigger (deploy with --entry-point trigger)."""

import functions_framework

from fedkeeper.platforms import gcf


@functions_framework.http
def trigger(request):
    """HTTP: the function's JSON API."""
    return gcf.http("trigger", request)
