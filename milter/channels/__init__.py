"""Delivery channels beside SMS: voice calls (text-to-speech over SIP) and fax (HylaFAX).

Rendering (`audio`, `faxdoc`) turns a job's content into what the peer carries; the providers
(`voice.VoiceProvider`, `fax.FaxProvider`) implement the dispatcher's `Provider` protocol.
"""
