"""The inference API's routes, one router per resource."""
