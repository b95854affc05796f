"""The serverless relay: burrow's tunnels on API Gateway (WebSocket + HTTP API), Lambda and
DynamoDB, with its CloudFormation template and a local emulator.

The Lambda side (``handlers`` and what it imports: ``protocol``, ``wsframes``, ``wsclient``,
``store``, ``config``, ``gateway``) is pure Python over boto3, so the package zip stays small
and imports fast; the agent (``agent``), the emulator and the template builder live beside it
and are never packaged. Importing this package imports nothing.
"""
