"""LiveKit's own Python SDK (livekit-api) as the reference for access tokens.

tests/livekit_tokens.rs runs this script with one command as its argument and
a JSON object on stdin, and reads one JSON object from stdout:

  verify  {key, secret, token, leeway_s?}
          -> {ok: true, claims: {...}, raw: {...}, may: {...}}
           | {ok: false, error: "<exception class>", message: "..."}
          Verifies with livekit.api.TokenVerifier (HS256, issuer = key, exp
          required, nbf and exp with the leeway, LiveKit's default one
          minute). `claims` is what the verifier decoded (video grants in
          snake case), `raw` the JWT's registered claims, and `may` what
          LiveKit's server would let the bearer do with these grants (the
          checks of livekit-server's pkg/service/auth.go).
  mint    {key, secret, identity, name?, kind?, metadata?, attributes?,
           grants: {snake_case VideoGrants fields}, ttl_s}
          -> {token}
          Mints with livekit.api.AccessToken; a negative ttl_s makes a token
          that has already expired.
  forge   {secret, claims: {...}, algorithm?}
          -> {token}
          Signs arbitrary claims with PyJWT (LiveKit's SDK signs with it too),
          for tokens the SDK will not mint (nbf in the future, another
          algorithm).
"""

import dataclasses
import datetime
import json
import sys

import jwt
from livekit import api


def may(video):
    """What LiveKit's server allows a bearer of these grants
    (EnsureJoinPermission, EnsureAdminPermission, EnsureCreatePermission,
    EnsureListPermission in livekit-server's pkg/service/auth.go)."""
    if video is None:
        return {"join_room": None, "admin_room": None, "create": False, "list": False}
    return {
        # A join token joins the room its grant names, and only that one.
        "join_room": video.room if video.room_join else None,
        # Admin calls are allowed for the grant's room only.
        "admin_room": video.room if video.room_admin else None,
        "create": bool(video.room_create),
        "list": bool(video.room_list),
    }


def verify(req):
    leeway = datetime.timedelta(seconds=req.get("leeway_s", 60))
    verifier = api.TokenVerifier(req["key"], req["secret"], leeway=leeway)
    try:
        claims = verifier.verify(req["token"])
    except Exception as e:  # noqa: BLE001 - reported to the Rust side
        return {"ok": False, "error": type(e).__name__, "message": str(e)}
    raw = jwt.decode(req["token"], options={"verify_signature": False})
    return {
        "ok": True,
        "claims": {
            "identity": claims.identity,
            "name": claims.name,
            "kind": claims.kind,
            "metadata": claims.metadata,
            "attributes": claims.attributes or {},
            "video": dataclasses.asdict(claims.video) if claims.video else None,
        },
        "raw": {k: raw.get(k) for k in ("iss", "sub", "nbf", "exp")},
        "may": may(claims.video),
    }


def mint(req):
    token = (
        api.AccessToken(req["key"], req["secret"])
        .with_identity(req.get("identity", ""))
        .with_grants(api.VideoGrants(**req["grants"]))
        .with_ttl(datetime.timedelta(seconds=req["ttl_s"]))
    )
    if req.get("name"):
        token = token.with_name(req["name"])
    if req.get("kind"):
        token = token.with_kind(req["kind"])
    if req.get("metadata"):
        token = token.with_metadata(req["metadata"])
    if req.get("attributes"):
        token = token.with_attributes(req["attributes"])
    return {"token": token.to_jwt()}


def forge(req):
    algorithm = req.get("algorithm", "HS256")
    return {"token": jwt.encode(req["claims"], req["secret"], algorithm=algorithm)}


def main():
    command = sys.argv[1]
    req = json.load(sys.stdin)
    out = {"verify": verify, "mint": mint, "forge": forge}[command](req)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
