"""The relay's state in one DynamoDB table (partition key ``pk``, TTL attribute ``ttl``): small
control items only, never a body.

* ``c#CONN``: a WebSocket connection: its role, its token's scope, the names it holds.
* ``t#NS#NAME``: a name (``NS`` http or svc): the connection holding it (absent while its agent
  reconnects), a hash of the agent's lease secret, when the hold ends (``exp``).
* ``n#NONCE``: a connect proof already used (replays are refused).

A name is claimed with one conditional write (free, ours, or expired), so two agents never
both hold it, and an agent that reconnects (the 2-hour limit) takes it back with its lease.
TTL deletes items lazily, so every read also checks ``exp`` itself.
"""

from __future__ import annotations

from typing import Any

from burrow.aws.serverless.config import GRACE, LEASE

DAY = 86400


def _conditional_failed(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    return bool(response.get("Error", {}).get("Code") == "ConditionalCheckFailedException")


class Store:
    def __init__(self, client: Any, table: str) -> None:
        self.db = client
        self.table = table

    # --- connections ----------------------------------------------------------------------------

    def put_connection(self, conn: str, role: str, scope: dict[str, Any], now: float) -> None:
        item: dict[str, Any] = {
            "pk": {"S": f"c#{conn}"},
            "role": {"S": role},
            "at": {"N": str(int(now))},
            "ttl": {"N": str(int(now) + DAY)},
            "expose": {"L": [{"S": p} for p in scope.get("expose", ())]},
            "connect": {"L": [{"S": p} for p in scope.get("connect", ())]},
        }
        for key in ("tid", "sub"):
            if scope.get(key):
                item[key] = {"S": scope[key]}
        self.db.put_item(TableName=self.table, Item=item)

    def get_connection(self, conn: str) -> dict[str, Any] | None:
        reply = self.db.get_item(
            TableName=self.table, Key={"pk": {"S": f"c#{conn}"}}, ConsistentRead=True
        )
        item = reply.get("Item")
        return _plain(item) if item else None

    def delete_connection(self, conn: str) -> dict[str, Any] | None:
        """Forget ``conn``; what it was (its names), read in the same call."""
        reply = self.db.delete_item(
            TableName=self.table, Key={"pk": {"S": f"c#{conn}"}}, ReturnValues="ALL_OLD"
        )
        item = reply.get("Attributes")
        return _plain(item) if item else None

    def set_names(self, conn: str, names: list[str]) -> None:
        self.db.update_item(
            TableName=self.table,
            Key={"pk": {"S": f"c#{conn}"}},
            UpdateExpression="SET #n = :n",
            ExpressionAttributeNames={"#n": "names"},
            ExpressionAttributeValues={":n": {"L": [{"S": n} for n in names]}},
        )

    def use_nonce(self, nonce: str, now: float) -> bool:
        """Record a connect proof's nonce; False if it was seen before (a replay)."""
        try:
            self.db.put_item(
                TableName=self.table,
                Item={"pk": {"S": f"n#{nonce}"}, "ttl": {"N": str(int(now) + 900)}},
                ConditionExpression="attribute_not_exists(pk)",
            )
        except Exception as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    # --- names ----------------------------------------------------------------------------------

    def claim(self, key: str, conn: str, owner: str, now: float) -> bool:
        """Hold name ``key`` (``NS#NAME``) for ``conn``: if free, expired, or already ours."""
        return self._write_name(
            key,
            int(now) + LEASE,
            "SET #c = :c, #o = :o, #e = :e, #t = :t",
            "attribute_not_exists(pk) OR #o = :o OR #e < :now",
            {":c": {"S": conn}, ":o": {"S": owner}, ":now": {"N": str(int(now))}},
            {"#o": "owner"},
        )

    def renew(self, key: str, conn: str, now: float) -> bool:
        return self._write_name(
            key, int(now) + LEASE, "SET #e = :e, #t = :t", "#c = :c", {":c": {"S": conn}}
        )

    def release(self, key: str, conn: str, now: float, grace: int = GRACE) -> bool:
        """``conn`` is gone: keep the name for its owner for ``grace`` seconds, with no
        connection (visitors get 502 meanwhile). Only if ``conn`` still holds it."""
        return self._write_name(
            key, int(now) + grace, "REMOVE #c SET #e = :e, #t = :t", "#c = :c", {":c": {"S": conn}}
        )

    def _write_name(
        self,
        key: str,
        exp: int,
        update: str,
        condition: str,
        values: dict[str, Any],
        names: dict[str, str] | None = None,
    ) -> bool:
        """One conditional write of a name's item, ending its hold at ``exp`` (the item lives a
        day longer, for TTL's lazy deletes); False when the condition does not hold."""
        try:
            self.db.update_item(
                TableName=self.table,
                Key={"pk": {"S": f"t#{key}"}},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames={"#c": "conn", "#e": "exp", "#t": "ttl", **(names or {})},
                ExpressionAttributeValues={
                    **values,
                    ":e": {"N": str(exp)},
                    ":t": {"N": str(exp + DAY)},
                },
            )
        except Exception as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    def lookup(self, key: str, now: float) -> tuple[bool, str | None]:
        """``(held, conn)``: whether anyone holds the name, and the connection if it is up."""
        reply = self.db.get_item(TableName=self.table, Key={"pk": {"S": f"t#{key}"}})
        item = reply.get("Item")
        if not item or int(item.get("exp", {}).get("N", "0")) < now:
            return False, None
        conn = item.get("conn", {}).get("S")
        return True, conn


def _plain(item: dict[str, Any]) -> dict[str, Any]:
    """A DynamoDB item as plain values (only the types this table uses)."""
    out: dict[str, Any] = {}
    for key, value in item.items():
        if "S" in value:
            out[key] = value["S"]
        elif "N" in value:
            out[key] = int(value["N"])
        elif "L" in value:
            out[key] = [v.get("S", "") for v in value["L"]]
    return out
