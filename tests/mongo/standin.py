"""A MongoDB wire-protocol stand-in for the gateway's tests.

mockupdb (MongoDB's wire-protocol server library) speaks the protocol; mongomock
executes the commands the gateway's MongoDB store sends (find, insert, update,
delete, createIndexes, listIndexes, drop). The data lives in memory and is saved to
--state after every write, so a stand-in stopped and started again keeps it, like a
real server. The extra command {standinStats: 1} returns how many commands of each
name arrived since the last {standinReset: 1}.

Usage: standin.py --port PORT --state FILE   (prints "listening on PORT" when ready)
"""

import argparse
import datetime
import os
import pickle
import sys
import threading
from collections import Counter

import mongomock
from bson.int64 import Int64
from mockupdb import MockupDB

HANDSHAKE = {"hello", "ismaster", "isMaster".lower()}
MONITORING = HANDSHAKE | {"ping", "endsessions", "killcursors", "buildinfo",
                          "standinstats", "standinreset"}


class StandIn:
    def __init__(self, state_path):
        self.state_path = state_path
        self.client = mongomock.MongoClient(tz_aware=True)
        self.lock = threading.Lock()
        self.counts = Counter()
        self.load()

    # -- persistence of the in-memory data across restarts ---------------------------
    def load(self):
        if not os.path.exists(self.state_path):
            return
        with open(self.state_path, "rb") as f:
            state = pickle.load(f)
        for db_name, collections in state.items():
            for coll_name, (docs, indexes) in collections.items():
                coll = self.client[db_name][coll_name]
                for key, options in indexes:
                    coll.create_index(key, **options)
                if docs:
                    coll.insert_many(docs)

    def save(self):
        state = {}
        for db_name in self.client.list_database_names():
            db = self.client[db_name]
            state[db_name] = {}
            for coll_name in db.list_collection_names():
                coll = db[coll_name]
                indexes = [
                    (info["key"], {k: v for k, v in info.items()
                                   if k in ("name", "unique")})
                    for name, info in coll.index_information().items() if name != "_id_"
                ]
                state[db_name][coll_name] = (list(coll.find()), indexes)
        tmp = self.state_path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(state, f)
        os.replace(tmp, self.state_path)

    # -- commands ----------------------------------------------------------------------
    def handle(self, request):
        doc = request.doc
        name = next(iter(doc))
        lname = name.lower()
        with self.lock:
            if lname not in MONITORING:
                self.counts[name] += 1
            try:
                reply = self.execute(lname, name, doc, request.namespace)
            except Exception as e:  # a bad command is the client's error, not ours
                reply = {"ok": 0, "errmsg": f"{type(e).__name__}: {e}", "code": 2}
        request.replies(reply)
        return True

    def execute(self, lname, name, doc, db_name):
        db = self.client[db_name or "admin"]
        if lname in HANDSHAKE:
            return hello()
        if lname in ("ping", "endsessions", "killcursors"):
            return {"ok": 1}
        if lname == "buildinfo":
            return {"version": "7.0.0", "versionArray": [7, 0, 0, 0], "ok": 1}
        if lname == "standinstats":
            return {"counts": dict(self.counts), "ok": 1}
        if lname == "standinreset":
            self.counts.clear()
            return {"ok": 1}
        coll = db[doc[name]] if isinstance(doc[name], str) else None
        if lname == "find":
            cursor = coll.find(doc.get("filter", {}), doc.get("projection"))
            if doc.get("sort"):
                cursor = cursor.sort(list(doc["sort"].items()))
            if doc.get("skip"):
                cursor = cursor.skip(int(doc["skip"]))
            if doc.get("limit"):
                cursor = cursor.limit(abs(int(doc["limit"])))
            return cursor_reply(db_name, doc[name], list(cursor))
        if lname == "findandmodify":
            query = doc.get("query") or {}
            sort = list(doc["sort"].items()) if doc.get("sort") else None
            if doc.get("remove"):
                value = coll.find_one_and_delete(query, sort=sort)
            else:
                update = doc.get("update") or {}
                after = mongomock.ReturnDocument.AFTER if doc.get("new") else mongomock.ReturnDocument.BEFORE
                if any(key.startswith("$") for key in update):
                    value = coll.find_one_and_update(query, update, sort=sort, upsert=bool(doc.get("upsert")), return_document=after)
                else:
                    value = coll.find_one_and_replace(query, update, sort=sort, upsert=bool(doc.get("upsert")), return_document=after)
            self.save()
            return {"value": value, "lastErrorObject": {"n": int(value is not None)}, "ok": 1}
        if lname == "aggregate":
            return cursor_reply(db_name, doc[name], list(coll.aggregate(doc.get("pipeline") or [])))
        if lname == "count":
            return {"n": coll.count_documents(doc.get("query") or {}), "ok": 1}
        if lname == "listindexes":
            indexes = [
                {"v": 2, "key": dict(info["key"]), "name": n,
                 **({"unique": True} if info.get("unique") else {})}
                for n, info in coll.index_information().items()
            ]
            return cursor_reply(db_name, doc[name], indexes)
        if lname == "insert":
            errors = []
            for i, d in enumerate(doc["documents"]):
                try:
                    coll.insert_one(d)
                except mongomock.DuplicateKeyError as e:
                    errors.append({"index": i, "code": 11000, "errmsg": str(e)})
                    if doc.get("ordered", True):
                        break
            self.save()
            return write_reply(len(doc["documents"]) - len(errors), errors)
        if lname == "update":
            n = modified = 0
            upserted, errors = [], []
            for i, u in enumerate(doc["updates"]):
                try:
                    op = coll.update_many if u.get("multi") else coll.update_one
                    result = op(u["q"], u["u"], upsert=bool(u.get("upsert")))
                except mongomock.DuplicateKeyError as e:
                    errors.append({"index": i, "code": 11000, "errmsg": str(e)})
                    if doc.get("ordered", True):
                        break
                    continue
                if result.upserted_id is not None:
                    upserted.append({"index": i, "_id": result.upserted_id})
                    n += 1
                else:
                    n += result.matched_count
                    modified += result.modified_count
            self.save()
            reply = write_reply(n, errors)
            reply["nModified"] = modified
            if upserted:
                reply["upserted"] = upserted
            return reply
        if lname == "delete":
            n = 0
            for d in doc["deletes"]:
                op = coll.delete_one if d.get("limit") == 1 else coll.delete_many
                n += op(d["q"]).deleted_count
            self.save()
            return write_reply(n, [])
        if lname == "createindexes":
            before = len(coll.index_information())
            for index in doc["indexes"]:
                options = {k: v for k, v in index.items() if k in ("name", "unique")}
                coll.create_index(list(index["key"].items()), **options)
            self.save()
            return {"numIndexesBefore": before,
                    "numIndexesAfter": len(coll.index_information()), "ok": 1}
        if lname == "drop":
            coll.drop()
            self.save()
            return {"ok": 1}
        if lname == "dropdatabase":
            self.client.drop_database(db_name)
            self.save()
            return {"ok": 1}
        return {"ok": 0, "errmsg": f"no such command: '{name}'", "code": 59,
                "codeName": "CommandNotFound"}


def hello():
    """The handshake fields the Rust driver requires of a writable primary."""
    return {
        "ismaster": True, "isWritablePrimary": True, "helloOk": True,
        "maxBsonObjectSize": 16 * 1024 * 1024,
        "maxMessageSizeBytes": 48_000_000,
        "maxWriteBatchSize": 100_000,
        "localTime": datetime.datetime.now(datetime.timezone.utc),
        "logicalSessionTimeoutMinutes": 30,
        "connectionId": 1,
        "minWireVersion": 0, "maxWireVersion": 17,
        "readOnly": False, "ok": 1,
    }


def cursor_reply(db_name, coll_name, docs):
    return {"cursor": {"id": Int64(0), "ns": f"{db_name}.{coll_name}", "firstBatch": docs},
            "ok": 1}


def write_reply(n, errors):
    reply = {"n": n, "ok": 1}
    if errors:
        reply["writeErrors"] = errors
    return reply


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--state", required=True)
    args = parser.parse_args()
    standin = StandIn(args.state)
    server = MockupDB(port=args.port, request_timeout=60)
    server.autoresponds(standin.handle)
    port = server.run()
    print(f"listening on {port}", flush=True)
    sys.stdin.read()  # runs until the test closes our stdin or kills us
    server.stop()


if __name__ == "__main__":
    main()
