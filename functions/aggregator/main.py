"""Google Cloud Functions entry for the FedKeeper aggregator (deploy with --entry-point aggregator)."""

import functions_framework

from fedkeeper.platforms import gcf


@functions_framework.http
def aggregator(request):
    """HTTP: the function's JSON API."""
    return gcf.http("aggregator", request)


@functions_framework.cloud_event
def aggregator_event(cloud_event):
    """GCS object finalized: aggregate the round if this update completed it (deploy with --entry-point aggregator_event)."""
    return gcf.cloud_event(cloud_event)
