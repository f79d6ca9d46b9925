"""Drop-in faces users already know: the IPyServer API and the indiserver command line."""
