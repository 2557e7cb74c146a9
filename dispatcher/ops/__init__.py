"""The ops API's parts: the error shape, authentication, and one router per area.

`dispatcher.ops_api.create_ops_app` assembles them; each router is built with the parts it needs.
"""
