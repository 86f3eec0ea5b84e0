"""ASPSMS XML interface (xmlsvr 1.9x) reply codes, as the public specification numbers them.

The descriptions are the specification's own strings, spelling included ("message date",
"temporarely"), because clients compare and display them.
"""

from __future__ import annotations

OK = 1
AUTHORIZATION_FAILED = 3
NOT_ENOUGH_CREDITS = 5
INVALID_USERKEY = 8
INVALID_PASSWORD = 9
INVALID_ORIGINATOR = 10
INVALID_MESSAGE_DATA = 11
INVALID_URL_BUFFERED = 17
INVALID_URL_DELIVERY = 18
INVALID_URL_NON_DELIVERY = 19
MISSING_RECIPIENT = 20
INVALID_DEFERRED_TIME = 22
MISSING_TRANS_REF = 23
SERVICE_UNAVAILABLE = 24
USER_ACCESS_DENIED = 25
ORIGINATOR_NOT_AUTHORIZED = 30
ORIGINATOR_AUTHORIZED = 31

DESCRIPTIONS: dict[int, str] = {
    1: "Ok",
    2: "Connect failed.",
    3: "Authorization failed.",
    4: "Binary file not found. Please check the location.",
    5: "Not enough credits available. Please recharge your account to proceed.",
    6: "Time out error.",
    7: "Transmission error. Please try it again.",
    8: "Invalid UserKey. Please check the spelling of the UserKey.",
    9: "Invalid Password.",
    10: "Invalid originator. A maximum of 11 characters is allowed for alphanumeric originators.",
    11: "Invalid message date. Please verify the data.",
    12: "Invalid binary data. Please verify the data.",
    13: "Invalid binary file. Please check the file type.",
    14: "Invalid MCC. Please check the number.",
    15: "Invalid MNC. Please check the number.",
    16: "Invalid XSer.",
    17: "Invalid URL buffered message notification string.",
    18: "Invalid URL delivery notification string.",
    19: "Invalid URL non delivery notification string.",
    20: "Missing a recipient. Please specify at least one recipient.",
    21: "Missing binary data. Please specify some data.",
    22: "Invalid deferred delivery time. Please check the format.",
    23: "Missing transaction reference number.",
    24: "Service temporarely not available.",
    25: "User access denied.",
    28: "No Originator Restrictions.",
    29: "Originator Authorization Pending.",
    30: "Originator Not Authorized.",
    31: "Originator already authorized",
}

# DeliveryStatus of an InquireDeliveryNotifications reply.
STATUS_NOT_YET = -1  # "Not yet submitted or rejected"
STATUS_DELIVERED = 0
STATUS_BUFFERED = 1
STATUS_NOT_DELIVERED = 2

JOB_STATE_STATUS: dict[str, int] = {
    "queued": STATUS_NOT_YET,
    "submitted": STATUS_NOT_YET,  # at the SMSC, no receipt yet
    "delivered": STATUS_DELIVERED,
    "buffered": STATUS_BUFFERED,
    "failed": STATUS_NOT_DELIVERED,
    "expired": STATUS_NOT_DELIVERED,
}

# ReasonCode: ASPSMS passes the network's three-digit reason; "000" when there is none.
REASON_NONE = "000"
REASON_DELIVERY_FAIL = "108"  # "Delivery fail"


def description(code: int) -> str:
    return DESCRIPTIONS.get(code, "Unknown error.")
